"""The MQTT link, its on-disk spool and the forwarder that drains it."""
