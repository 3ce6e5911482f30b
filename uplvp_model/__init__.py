"""uplvp models: tensor functions only (no files, no Ray)."""
