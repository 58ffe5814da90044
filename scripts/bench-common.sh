# Shared by the load scripts (sourced): what they need installed, and waiting for a port.

# wrk, from Debian's package, when it is missing.
need_wrk() {
  command -v wrk >/dev/null && return
  echo "installing wrk"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq wrk
}
