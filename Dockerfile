# payswitch image. `make image` builds it with buildah from a local Debian base (no
# registry needed); anywhere a registry is reachable: docker build -t payswitch:0.1.0 .
#
# BASE must provide python3 (3.11) with venv/ensurepip. The default is the official
# python:3.11-slim pinned by digest, so a rebuild never silently takes another base; bump
# it on purpose (docker buildx imagetools inspect python:3.11-slim). `make image` passes
# BASE=localhost/payswitch-base:bookworm, a debootstrap'd bookworm with python3.
ARG BASE=python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
WORKDIR /src
# Every dependency (with the OTLP exporter and the build backend) at one version and one
# hash: pip refuses anything the lock does not name, so the image is what was reviewed.
# Behind a TLS-inspecting proxy, hand its CA bundle in as the secret `cacert` (`--secret
# id=cacert,src=/etc/ssl/certs/ca-certificates.crt`): it is mounted for this step only and
# never lands in a layer. The hashes are checked either way.
COPY deploy/docker/requirements.lock ./
RUN --mount=type=secret,id=cacert \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi \
 && python3 -m venv /opt/payswitch \
 && /opt/payswitch/bin/pip install --require-hashes --no-deps --only-binary=:all: \
      -r requirements.lock
# A C compiler for the native build, in this stage only (with Python's headers where the
# base lacks them: Debian's python3 keeps them in python3-dev).
RUN set -eu; \
    include=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
    pkgs="gcc libc6-dev"; [ -f "$include/Python.h" ] || pkgs="$pkgs python3-dev"; \
    apt-get update -qq; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; \
    rm -rf /var/lib/apt/lists/*
# pyproject.toml names README.md as the package's readme, so the build needs it too.
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY deploy/native/build.py deploy/native/build.py
COPY proxy/ proxy/
# The build backend comes from the lock, not from an unpinned isolated build env. Then the
# request path is compiled (deploy/native/build.py, mypyc from the lock) and its extensions
# laid over the installed package; then the installers and the compiler leave the venv,
# so the runtime has no pip, setuptools or mypy.
RUN set -eu; \
    /opt/payswitch/bin/pip install --no-deps --no-build-isolation --no-index .; \
    /opt/payswitch/bin/python deploy/native/build.py --out /src/native; \
    site=$(/opt/payswitch/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
    cp /src/native/*__mypyc*.so "$site"/; \
    (cd /src/native && find proxy -name '*.so' -exec cp --parents {} "$site"/ \;); \
    (cd / && /opt/payswitch/bin/python -c 'import proxy.handler as h; assert h.__file__.endswith(".so"), h.__file__'); \
    /opt/payswitch/bin/python -m pip uninstall --yes --quiet \
      setuptools pip mypy pathspec librt ast-serialize types-jsonschema types-pyyaml; \
    find /opt/payswitch -name '__pycache__' -prune -exec rm -rf {} +; \
    /opt/payswitch/bin/python -m compileall -q /opt/payswitch/lib

FROM ${BASE}
# No installer in the runtime: drop whatever pip, setuptools, wheel and bundled
# ensurepip wheels the base carries (the official image ships pip; Debian's venv support
# ships wheels), then add the user. A fixed numeric uid, so Kubernetes' runAsNonRoot can
# check it (the manifests run as the same uid).
RUN set -eu; \
    rm -rf /usr/local/bin/pip* /usr/local/lib/python3*/site-packages/pip* \
      /usr/local/lib/python3*/site-packages/setuptools* \
      /usr/local/lib/python3*/site-packages/wheel* \
      /usr/local/lib/python3*/ensurepip /usr/lib/python3*/ensurepip \
      /usr/share/python-wheels /usr/lib/python3/dist-packages/pip*; \
    groupadd --gid 10001 payswitch; \
    useradd --uid 10001 --gid 10001 --no-create-home --no-log-init --shell /usr/sbin/nologin payswitch; \
    mkdir -p /etc/payswitch/rules
# The rules schema is read at run time (PAYSWITCH_SCHEMAS) where the package lacks it.
COPY schemas/ /usr/share/payswitch/schemas/
COPY deploy/docker/healthcheck.py /usr/local/bin/payswitch-healthcheck
COPY --from=build /opt/payswitch /opt/payswitch
ENV PATH=/opt/payswitch/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PAYSWITCH_SCHEMAS=/usr/share/payswitch/schemas \
    PAYSWITCH_RULES=/etc/payswitch/rules \
    PAYSWITCH_LISTEN=0.0.0.0:8080 \
    PAYSWITCH_ADMIN=127.0.0.1:9901
USER 10001:10001
# 8080 payment traffic; 9901 admin API (loopback unless PAYSWITCH_ADMIN says otherwise);
# 9102 probes and /metrics when PAYSWITCH_PROBES is set, as the Kubernetes manifests do.
EXPOSE 8080 9901 9102
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python3", "/usr/local/bin/payswitch-healthcheck"]
# payswitch is PID 1 and handles SIGTERM itself: readiness fails, in-flight payments get
# PAYSWITCH_SHUTDOWN_DEADLINE (20s) to finish. Give `docker stop` at least that: -t 30.
ENTRYPOINT ["payswitch", "run"]
# Last, so a new revision rebuilds only this layer.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="payswitch" \
      org.opencontainers.image.description="Declarative routing sidecar for payment traffic" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.com/payswitch"
