"""The update path: verify, stage, gate and activate models; OTA polling and fetching."""
