# The key-value service as a container: `docker build -t kv . && docker run -p 8000:8000 kv`.
# Any base with python3 and its venv module works: --build-arg PYTHON_IMAGE=...
ARG PYTHON_IMAGE=python:3.12-slim

# --- build: install the package and its dependencies into a self-contained virtualenv -------
FROM ${PYTHON_IMAGE} AS build
RUN python3 -m venv /opt/kv
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY mapmg_data_engineer_takehome ./mapmg_data_engineer_takehome
RUN /opt/kv/bin/pip install --no-cache-dir --disable-pip-version-check .
# input.db is optional in the build context: stage it only when it is there.
COPY . /context
RUN mkdir -p /seed && if [ -f /context/input.db ]; then cp /context/input.db /seed/; fi

# --- runtime: the virtualenv, the optional seed, a non-root user ---------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --gid 10001 kv \
    && useradd --uid 10001 --gid kv --home-dir /app --no-create-home --shell /usr/sbin/nologin kv \
    && mkdir -p /app /data \
    && chown kv:kv /data
COPY --from=build /opt/kv /opt/kv
COPY --from=build /seed/ /app/
ENV PATH=/opt/kv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KV_HOST=0.0.0.0 \
    KV_DATA_PATH=/data/kv.sqlite3 \
    KV_LOG_FORMAT=json
# The server seeds from ./input.db: baked in above, or mounted at /app/input.db.
WORKDIR /app
VOLUME /data
EXPOSE 8000
USER kv
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "mapmg_data_engineer_takehome.healthcheck"]
# Exec form: the server is PID 1 and gets docker stop's SIGTERM itself.
CMD ["python", "-m", "mapmg_data_engineer_takehome"]
