# rlmq: one image for every role (rlm worker, llm worker, beat, flower, the CLI).
#   docker build -t rlmq .            docker run --rm rlmq            (prints `rlmq --help`)
# No secrets are baked in: keys and settings come from the environment at run time
# (docker compose passes .env with env_file; see .env.example).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MPLBACKEND=Agg

# An unprivileged user with a home (matplotlib, dotenv and celery beat write there).
RUN groupadd --system --gid 10001 rlmq \
 && useradd --system --uid 10001 --gid rlmq --create-home --home-dir /home/rlmq \
        --shell /usr/sbin/nologin rlmq

# bubblewrap: the local sandbox's namespaces (docs/security.md says what the container must allow).
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# Dependencies first, read from pyproject.toml, so this layer is reused while only the
# source changes. Every dependency ships binary wheels for CPython 3.11 on Linux: no compiler.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['demo']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The project itself: the user's package rlmq/, and broker_bridge/, tasks/, workers/.
COPY README.md ./
COPY rlmq ./rlmq
COPY broker_bridge ./broker_bridge
COPY tasks ./tasks
COPY workers ./workers
RUN pip install ".[demo]" \
 && cd / && rm -rf /src \
 && rlmq --help > /dev/null

WORKDIR /home/rlmq
USER 10001:10001

CMD ["rlmq", "--help"]
