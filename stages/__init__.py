"""uplvp stages: one module per CLI command (thin glue over pipeline and uplvp_model)."""
