"""Command-line tools around runs: bench (figures of one job), compare (methods x seeds), plot (curves)."""
