"""Deployment artefacts, the demo upstream, the health probe and the local stack."""
