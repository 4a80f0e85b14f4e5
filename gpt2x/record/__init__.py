"""The run folder's files (record.json, metrics.jsonl, ...) and W&B logging. Imports no torch."""
