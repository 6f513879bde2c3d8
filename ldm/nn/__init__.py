"""Networks only (torch.nn, no Lightning)."""
