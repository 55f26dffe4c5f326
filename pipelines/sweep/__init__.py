"""Ray Tune sweeps of MagNet: the sweep file (space), one trial (trial), the driver (driver) and
the tables, aggregates and reports of results (report)."""
