"""The one event path: event rows written with each change → tailer → bounded per-subscriber queues."""
