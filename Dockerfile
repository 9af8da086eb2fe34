# Build the release binary, then run it on a slim image as a non-root user.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin kvgate

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/kvgate --create-home kvgate
COPY --from=build /src/target/release/kvgate /usr/local/bin/kvgate
COPY config/kvgate.toml /etc/kvgate/kvgate.toml
USER kvgate
WORKDIR /var/lib/kvgate
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/kvgate"]
# Listen on all interfaces inside the container; state (redb) in the home dir.
CMD ["--config", "/etc/kvgate/kvgate.toml", "--listen", "0.0.0.0:8080"]
