"""Scenarios, data, the simulate driver and its reports."""
