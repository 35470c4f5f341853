"""Tasks and data: GLUE task specifications (`glue`), loading / splitting / tokenising / batching
(`data`) and the official metrics (`metrics`). Imports nothing from the model layers."""
