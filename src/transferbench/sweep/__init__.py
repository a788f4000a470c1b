"""Planning and running a study's cells, their cost, their records, and the memory check."""
