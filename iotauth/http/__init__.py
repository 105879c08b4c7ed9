"""``iotauth serve``: the stateless HTTP front ends (EMQX and Mosquitto authorizers, CRL, OCSP, admin API)."""
