"""Development and test tooling for cd4ml; never installed in the runtime image.

`stack` runs the embedded stack (`make up`), `compose` and `scale` run docker-compose.yaml's services
as local processes (`make test-scale`), `datagen` writes the demo's synthetic churn data.
"""
