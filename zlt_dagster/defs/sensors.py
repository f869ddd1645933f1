"""Sensors (the sweep registry sensor comes with the user-flows work)."""
ALL_SENSORS: list = []
