# mailflow as a container image (docs/operations.md, "Container").
#
#   docker build -t mailflow .
#   docker run -d --name mx -p 25:25 -v mx-queue:/var/spool/mailflow -v mx-mail:/var/mail \
#       -v ./mailflow.toml:/etc/mailflow/config.toml:ro mailflow
#
# BASE is any Debian-based image with Python 3.11 and its venv module: python:3.11-slim by default;
# scripts/container-smoke.sh builds from a locally made Debian base (--build-arg BASE=...).
# The server runs as the unprivileged user mailflow (uid 2525) and drains on SIGTERM within shutdown_grace (8 s
# in the default configuration, below docker stop's 10 s). `docker exec mx mailflow reload` reloads it.
ARG BASE=python:3.11-slim

# ---- build: the package and its dependencies in a virtual environment, nothing else kept
FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mailflow ./mailflow
RUN python3 -m venv /opt/mailflow \
    && /opt/mailflow/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && /opt/mailflow/bin/mailflow version

# ---- run: the environment, the default configuration, a user and its directories
FROM ${BASE}
COPY --from=build /opt/mailflow /opt/mailflow
COPY container/config.toml /etc/mailflow/config.toml
RUN useradd --system --uid 2525 --user-group --home-dir /var/spool/mailflow --no-create-home \
        --shell /usr/sbin/nologin mailflow \
    && install -d -o mailflow -g mailflow -m 0750 /var/spool/mailflow \
    && install -d -o mailflow -g mailflow -m 0755 /var/mail \
    && /opt/mailflow/bin/mailflow check-config
ENV PATH=/opt/mailflow/bin:$PATH \
    MAILFLOW_CONFIG=/etc/mailflow/config.toml
VOLUME ["/var/spool/mailflow", "/var/mail"]
# SMTP, submission, submissions, and the HTTP listener ([http]: the admin API, the queue page, the capture API)
EXPOSE 25 587 465 8025
USER 2525:2525
WORKDIR /var/spool/mailflow
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["mailflow", "health", "--timeout", "5"]
ENTRYPOINT ["mailflow"]
CMD ["serve"]
