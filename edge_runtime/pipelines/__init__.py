"""Pipelines that feed models from sources (folders, video, MQTT input)."""
