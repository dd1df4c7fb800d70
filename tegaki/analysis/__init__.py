"""Looking inside models: parameter tables, traces, attention maps, comparisons, plots."""
