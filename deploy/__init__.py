"""Deployment: how DvD's processes are started, on one node or many (`dvd.deploy`)."""
