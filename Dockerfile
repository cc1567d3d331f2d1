# syntax=docker/dockerfile:1
#
# wa-router in a container.
#
#   docker build -t wa-router .          # BuildKit (Docker 23+; before: DOCKER_BUILDKIT=1)
#   docker run --rm wa-router check-config /etc/wa-router/router.yaml
#   docker run -d --name wa-router --network host --init \
#       -v /etc/wa-router/router.yaml:/etc/wa-router/router.yaml:ro \
#       -v wa-router-state:/var/lib/wa-router wa-router
#
# Config: the file $WA_ROUTER_CONFIG (the documented example by default: mount yours over
# it), and any key from the environment, WA_ROUTER_<SECTION>__<KEY>, which wins over the
# file (e.g. -e WA_ROUTER_STORE__KIND=redis -e WA_ROUTER_STORE__REDIS_URL=redis://redis:6379/0).
# The environment below sets the listen address, the port, the state directory and JSON
# logs; the HEALTHCHECK reads WA_ROUTER_SERVER__PORT, so change the port there, not only
# in the file. `--network host` reaches Blazz's PM2 pool on 127.0.0.1:3001-3004 as the
# example config names it; on a bridge network, list the instances as the container
# reaches them (deploy/docker-compose.yml). On SIGTERM (docker stop) the router finishes
# what is in flight within server.shutdown_grace_s (15 s): give `docker stop -t 25` or
# compose's stop_grace_period more than that (Docker's default is 10 s). SIGHUP
# (docker kill -s HUP) reloads the config.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- 1: the wheels ------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY wa_router ./wa_router
# The project's wheel and every dependency's, so that the runtime stage installs them
# without a compiler, the network or a pip cache.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- 2: the runtime -----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG APP_UID=10001
ARG APP_GID=10001
LABEL org.opencontainers.image.title="wa-router" \
      org.opencontainers.image.description="Session-aware HTTP router in front of a pool of Node.js WhatsApp services" \
      org.opencontainers.image.licenses="MIT"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    WA_ROUTER_CONFIG=/etc/wa-router/router.yaml \
    WA_ROUTER_SERVER__HOST=0.0.0.0 \
    WA_ROUTER_SERVER__PORT=8080 \
    WA_ROUTER_STATE__DIR=/var/lib/wa-router \
    WA_ROUTER_LOG__FORMAT=json
# The wheels are bind-mounted from the first stage: they never become a layer here.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/wa_router-*.whl \
    && groupadd --system --gid "${APP_GID}" wa-router \
    && useradd --system --uid "${APP_UID}" --gid wa-router --no-create-home \
        --home-dir /var/lib/wa-router --shell /usr/sbin/nologin wa-router \
    && mkdir -p /etc/wa-router /var/lib/wa-router \
    && wa-router init-config /etc/wa-router/router.yaml \
    && chown wa-router:wa-router /var/lib/wa-router \
    && chmod 0750 /var/lib/wa-router

# The webhook backlog (SQLite) or the spool beside Redis: one volume per router.
VOLUME ["/var/lib/wa-router"]
WORKDIR /var/lib/wa-router
USER ${APP_UID}:${APP_GID}
EXPOSE 8080
STOPSIGNAL SIGTERM
# /readyz: 200 once the first sync is done (at most sync.startup_timeout_s) and an instance
# is healthy; 503 otherwise. urlopen raises on a 503 or a refused connection: exit 1.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('WA_ROUTER_SERVER__PORT', '8080') + '/readyz', timeout=2)"]
ENTRYPOINT ["wa-router"]
CMD ["serve"]
