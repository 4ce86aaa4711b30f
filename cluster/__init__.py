"""How clusters start: a local head + workers script, cluster-launcher YAML, KubeRay manifests, runtime envs."""
