"""What the device reports: metrics, events, the telemetry document, sd_notify."""
