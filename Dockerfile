# payswitch: docker build -t payswitch:0.1.0 .
# Rules are mounted at /etc/payswitch/rules (deploy/kubernetes mounts a ConfigMap there).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# pyproject.toml names README.md as the package's readme, so the build needs it too.
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
RUN python -m venv /opt/payswitch && /opt/payswitch/bin/pip install .

FROM python:3.11-slim
# The rules schema is read at run time and is not part of the Python package.
COPY schemas/ /usr/share/payswitch/schemas/
COPY deploy/docker/healthcheck.py /usr/local/bin/payswitch-healthcheck
COPY --from=build /opt/payswitch /opt/payswitch
# A fixed numeric user, so Kubernetes' runAsNonRoot can check it (deployment.yaml runs
# as the same uid).
RUN groupadd --system --gid 10001 payswitch \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin payswitch \
 && mkdir -p /etc/payswitch/rules
ENV PATH=/opt/payswitch/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PAYSWITCH_SCHEMAS=/usr/share/payswitch/schemas \
    PAYSWITCH_RULES=/etc/payswitch/rules \
    PAYSWITCH_LISTEN=0.0.0.0:8080 \
    PAYSWITCH_ADMIN=127.0.0.1:9901
USER 10001:10001
# 8080 payment traffic; 9901 admin (probes, /metrics), on loopback unless PAYSWITCH_ADMIN
# says otherwise: Kubernetes sets 0.0.0.0:9901 so kubelet and Prometheus reach it.
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "/usr/local/bin/payswitch-healthcheck"]
# payswitch is PID 1 and handles SIGTERM itself: readiness fails, in-flight payments get
# PAYSWITCH_SHUTDOWN_DEADLINE (20s) to finish. Give `docker stop` at least that: -t 30.
ENTRYPOINT ["payswitch", "run"]
