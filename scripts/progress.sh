# Progress lines for the long steps of scripts/setup_env.sh (which sources this file; so does
# tests/test_setup_progress.py). Set progress_start (SECONDS at the start) and progress_label
# ("setup") first; build_lines shortens the paths under $repo.

say() { echo "[${progress_label:-setup} +$((SECONDS - ${progress_start:-0}))s] $*"; }

# Reads a long command's output (stdin) and prints the lines worth seeing, via the filter
# function named by $1 (it prints a line, or nothing to drop it), each with the elapsed
# time; after a minute (MISS_PROGRESS_INTERVAL seconds) without output it says the step is
# still running, so a slow install or compile on a loaded machine never looks hung.
show_progress() {
  local filter="$1" interval="${MISS_PROGRESS_INTERVAL:-60}" line="" pending="" shown
  local last="the start of this step" last_at=$SECONDS beat_at=$SECONDS
  while true; do
    if IFS= read -r -t "$interval" line; then
      shown="$("$filter" "$pending$line")"
      pending=""
      # The same line twice in a row (pip runs setup.py once for metadata, once to build) once.
      if [ -n "$shown" ] && [ "$shown" != "$last" ]; then
        say "$shown"; last="$shown"; last_at=$SECONDS; beat_at=$SECONDS
        continue
      fi
    elif [ $? -gt 128 ]; then  # timed out: keep any partial line for the next read
      pending="$pending$line"
    else
      if [ -n "$pending$line" ]; then
        shown="$("$filter" "$pending$line")"
        if [ -n "$shown" ]; then say "$shown"; fi
      fi
      break
    fi
    # Quiet, or only lines that are dropped, for a while.
    if [ $((SECONDS - beat_at)) -ge "$interval" ]; then
      say "... still running ($((SECONDS - last_at)) s since: ${last:0:100})"
      beat_at=$SECONDS
    fi
  done
}

# pip's lines about progress; not the "Location ... is ignored" lines this machine's pip
# configuration prints, nor one line per requirement that is already satisfied.
pip_lines() {
  local line="${1#"${1%%[![:space:]]*}"}"  # without leading blanks ("  Downloading ...")
  case "$line" in
    Collecting*|Downloading*|Processing*|"Installing collected packages"*|"Successfully installed"*|ERROR*|error*)
      echo "pip: ${line:0:300}" ;;
  esac
}

# From pip -v's output of the build: setup.py's own lines, ninja's "[k/n] <command>" lines
# shortened to the file they compile, the link, and errors. The full output is in the log.
build_lines() {
  local line="${1#"${1%%[![:space:]]*}"}"  # without leading blanks
  case "$line" in
    "miss_ext build:"*) echo "$line" ;;
    \[[0-9]*/[0-9]*\]*)
      local step="${line%%]*}]" source=""
      # the file after -c (torch writes "-c -c <file>")
      if [[ "$line" =~ \ -c\ ([^ -][^ ]*) ]]; then source="${BASH_REMATCH[1]#"$repo/"}"; fi
      echo "compile $step ${source:-${line:0:120}}" ;;
    *" -shared "*) echo "link miss_ext/_C" ;;
    *"error:"*|*"Error"*|FAILED:*) echo "${line:0:300}" ;;
  esac
}
