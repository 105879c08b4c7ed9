"""Exports of iotauth's CA, CRL and topic policies for other brokers."""
