"""The report layer: every table, figure and report mech writes. Computation lives elsewhere and returns data."""
