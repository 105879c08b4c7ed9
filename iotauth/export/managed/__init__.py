"""Managed Mosquitto: iotauth keeps a running Mosquitto in step with the registry."""
