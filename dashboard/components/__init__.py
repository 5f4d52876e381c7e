"""Reusable widgets and figures shared by the pages."""
