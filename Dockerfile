# The executor itself (`executor serve`), for `docker compose up` (see compose.yaml).
# Builds with the classic builder and without a registry, as long as `debian:bookworm-slim` is present:
#   docker build --network host -t executor:latest .
FROM debian:bookworm-slim
# git: the evaluation gate keys its cache of *before* runs on a clean repository's HEAD tree.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates git \
 && rm -rf /var/lib/apt/lists/*
# Where a proxy intercepts TLS, pip needs the same extra CAs the sandbox image trusts (sandbox/certs/).
COPY sandbox/certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/executor/bin:$PATH
RUN python3 -m venv /opt/executor
WORKDIR /src
# Dependencies first (a layer that survives code changes): the runtime dependencies of pyproject.toml,
# pinned by requirements.lock (the lock also pins the test extras, which the image does not need).
COPY pyproject.toml requirements.lock README.md ./
# pip's own error is shown (-q hides only its progress), then what usually causes it.
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && { pip install -q -c requirements.lock -r /tmp/requirements.txt || { \
      echo "executor: installing the executor's Python dependencies failed (pip's error is above)." >&2; \
      echo "executor: behind a proxy that intercepts TLS (pip says CERTIFICATE_VERIFY_FAILED), put the proxy's CA" >&2; \
      echo "executor: certificate (PEM, named *.crt) into sandbox/certs/ and build again (README: Quick start)." >&2; \
      exit 1; }; } \
 && rm /tmp/requirements.txt
COPY executor/ executor/
RUN pip install -q --no-deps . && rm -rf /src/build && executor --help >/dev/null
WORKDIR /
LABEL org.opencontainers.image.title="executor"
# Runs as root, on purpose: the executor creates each job's upper/work dirs owned by the repository's
# owner (chown), applies a job's changes into the repository as that owner (fchown of every file it
# writes) and must read and write repositories of several users. Those are root's privileges; compose.yaml
# drops every other capability. (Holding the Docker socket makes it host-root-equivalent anyway.)
USER root
ENTRYPOINT ["executor"]
CMD ["serve"]
