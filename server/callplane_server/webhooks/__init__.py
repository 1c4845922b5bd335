"""Webhook delivery: Standard Webhooks signing, target checks and the per-endpoint delivery workers."""
