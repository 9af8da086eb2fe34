# Build the release binary, then run it on a slim image as a non-root user.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin kvgate

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/kvgate --create-home kvgate
COPY --from=build /src/target/release/kvgate /usr/local/bin/kvgate
# Listens on 0.0.0.0:8080 (gateway) and 0.0.0.0:9090 (admin, token from
# KVGATE_ADMIN_TOKEN, required); the origin comes from KVGATE_ORIGIN.
COPY config/container.toml /etc/kvgate/kvgate.toml
USER kvgate
WORKDIR /var/lib/kvgate
# Edge state (redb) survives the container.
VOLUME /var/lib/kvgate
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/kvgate", "health", "--admin", "127.0.0.1:9090"]
ENTRYPOINT ["/usr/local/bin/kvgate"]
CMD ["--config", "/etc/kvgate/kvgate.toml"]
