# Weir in a container. Build: docker build -t weir .
# Run (proxy published on all interfaces, Admin API on the host's loopback only):
#   docker run -d --name weir -p 9080:9080 -p 127.0.0.1:9180:9180 \
#     -e WEIR_ADMIN_KEY=change-me-please -v weir-data:/var/lib/weir weir
# The config is /etc/weir/weir.yaml (dist/docker.yaml); mount your own over it.

FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p weir && cp target/release/weir /usr/local/bin/weir

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/weir --shell /usr/sbin/nologin weir \
    && mkdir -p /var/lib/weir /etc/weir && chown weir:weir /var/lib/weir
COPY --from=build /usr/local/bin/weir /usr/local/bin/weir
COPY dist/docker.yaml /etc/weir/weir.yaml
COPY LICENSE /usr/share/doc/weir/LICENSE
USER weir
VOLUME /var/lib/weir
EXPOSE 9080 9180
# docker stop sends SIGTERM: requests in flight get shutdown_timeout (30 s) to finish; give
# `docker stop -t 40` when you raise it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["serve", "--config", "/etc/weir/weir.yaml"]
