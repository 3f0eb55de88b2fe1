# Source it: copy_jars POM DEST copies the runtime jars of a Maven pom from Maven Central into DEST,
# a cache directory outside the clone. Skipped when DEST is complete (it holds .complete naming the
# pom's checksum); fails with what to install when Java 17+ or mvn is missing.

require_java_and_maven() {
  if ! command -v java >/dev/null 2>&1; then
    echo "java not found; Java 17 or newer is needed (Debian: apt-get install openjdk-17-jdk-headless)" >&2
    return 1
  fi
  local v
  v=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
  if [[ -z "$v" || "${v%%.*}" -lt 17 ]]; then
    echo "Java ${v:-of unknown version} found; Java 17 or newer is needed" >&2
    return 1
  fi
  if ! command -v mvn >/dev/null 2>&1; then
    echo "mvn not found; it fetches the jars from Maven Central (Debian: apt-get install maven)" >&2
    return 1
  fi
}

copy_jars() {
  local pom=$1 dest=$2 sum tmp
  sum=$(sha256sum "$pom" | cut -c1-16)
  if [[ -f "$dest/.complete" && "$(cat "$dest/.complete")" == "$sum" ]]; then
    return 0
  fi
  require_java_and_maven || return 1
  echo "fetching the jars of $pom from Maven Central into $dest" >&2
  tmp="$dest.partial.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  if ! mvn --batch-mode --quiet -f "$pom" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$tmp" >&2; then
    rm -rf "$tmp"
    echo "mvn could not fetch the jars of $pom; see its output above" >&2
    return 1
  fi
  echo "$sum" >"$tmp/.complete"
  rm -rf "$dest"
  mv "$tmp" "$dest"
}
