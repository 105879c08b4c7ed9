"""Managed Mosquitto: iotauth keeps a running Mosquitto 2.x in step with the registry, live.

``iotauth export mosquitto --managed`` writes the configuration; ``iotauth
mosquitto follow DIR`` runs the follower beside Mosquitto. Mosquitto's
dynamic-security plugin holds one role and one client per active device
(rights from the same policy engine as ``iotauth broker``) and kicks live
sessions on command; the CRL, proven loaded before every kick, refuses the
reconnect.

* :mod:`.state` -- pure: roles, plans, the state file (what dynsec 2.0.11 accepts and does);
* :mod:`.control` -- the control-topic client (paho, QoS 0, answers by correlationData);
* :mod:`.crl` -- CRLs with canaries: sign, check, write, SIGHUP, prove;
* :mod:`.process` -- the Mosquitto process: verified pid, SIGHUP, restart command;
* :mod:`.layout` -- the export's files, modes, owners and the follower's credentials;
* :mod:`.enforce` -- applies a plan in the one safe order (CRL, kicks, grants overtaken by revocations);
* :mod:`.follower` -- the feed follower: batches, reconciles, rebuilds, audit;
* :mod:`.service` -- assembles a follower for one export directory.
"""
