"""Tests of cluster/: the local cluster script and the launcher / KubeRay manifests."""
