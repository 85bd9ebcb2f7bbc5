"""The local inference API (KServe / Open Inference Protocol v2 over HTTP)."""
