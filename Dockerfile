# The image that deploy/rayjob.yaml (and the CronJob that creates it) runs on every Ray node: Ray's
# official GPU image at the Ray version the manifests pin, with this project installed.
#   docker build -t registry.example.com/dlbatch:$(git rev-parse --short HEAD) .
#   docker push registry.example.com/dlbatch:$(git rev-parse --short HEAD)
# then set that tag as the image of the RayJob's head and worker containers.
# tests/test_deploy.py checks that this tag, pyproject.toml's Ray requirement and the manifests'
# rayVersion agree.
FROM rayproject/ray:2.60.0-py311-gpu

# The RayJob's entrypoint (python jobs/nightly.py ...) runs in the directory `ray start` ran in.
WORKDIR /home/ray/dlbatch
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users dlbatch ./dlbatch
COPY --chown=ray:users jobs ./jobs
# Ray is already in the image (this keeps it); torch comes from PyPI, its CUDA build on Linux. Extras by
# name, e.g. --build-arg EXTRAS=backbones,mlflow (pretrained backbones, MLflow tracking).
ARG EXTRAS=""
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" && python -c "import dlbatch.flow, ray, torch; print(ray.__version__, torch.__version__)"
