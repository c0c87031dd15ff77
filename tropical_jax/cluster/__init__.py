"""Multi-worker clusters: worker meshes, worker loops driven by the shared scheduler, KV handoff."""
