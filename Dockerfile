# syntax=docker/dockerfile:1
# delegation-operator as a small static image: one statically linked executable on distroless/static
# (no shell, no package manager, no libc), running as the non-root user 65532.
#
#   docker build -t delegation-operator:dev .
#
# The build stage runs hack/static-build.sh, the very script the test command runs (hack/test.sh), so
# the build step is checked on machines without a container engine. The executable needs nothing from
# the image at run time: glibc's static libc resolves names with its built-in files/dns services.
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/root/.cache/delegation-operator \
    hack/static-build.sh --out /out/delegation-operator --check

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="delegation-operator" \
      org.opencontainers.image.description="Turns DelegationGrants into short-lived, scoped, signed on-behalf-of tokens" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/delegation-operator /delegation-operator
USER 65532:65532
ENTRYPOINT ["/delegation-operator"]
CMD ["run"]
