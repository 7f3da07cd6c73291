"""Placing a fleet on a cluster: Kubernetes manifests (`turbine deploy k8s`), Ray actors
(`turbine serve --ray`). Nothing here imports ray or kubernetes at import time."""
