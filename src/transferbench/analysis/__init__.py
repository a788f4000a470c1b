"""From records to tables: gains with intervals, arms, the regression gate."""
