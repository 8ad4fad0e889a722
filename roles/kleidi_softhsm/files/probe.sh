# Reports, as one line of JSON, whether a node's SoftHSM2 token directory holds the token and its KEK.
# Arguments: SoftHSM2 config (host path), PKCS#11 module, token label, key label, token directory (host path).
# Standard input: the user PIN, to log in and count the keys when the token exists. It is read first, always:
# Ansible fails the task if the script exits before taking what it was given.
# Read-only: runs nothing that creates or changes a token.
set -u
conf=$1 module=$2 label=$3 key=$4 dir=$5
IFS= read -r KLEIDI_SOFTHSM_PIN || true
export KLEIDI_SOFTHSM_PIN
if [ ! -f "$conf" ] || [ ! -d "$dir" ]; then
  printf '{"path": "%s", "token": false, "free_slot": "0"}\n' "$dir"
  exit 0
fi
export SOFTHSM2_CONF="$conf"
if ! slots=$(pkcs11-tool --module "$module" --list-token-slots 2>&1); then
  echo "pkcs11-tool cannot list the slots of $dir: $slots" >&2
  exit 1
fi
# "count serial pin_initialized free_slot" for the slots whose token has the label.
set -- $(printf '%s\n' "$slots" | awk -v want="$label" '
  function flush() {
    if (idx == "") return
    if (uninit) { if (free == "") free = idx }
    else if (lab == want) { n++; out_serial = serial; out_pin = pin }
  }
  /^Slot [0-9]+ / { flush(); idx = $2; lab = ""; serial = "-"; pin = 0; uninit = 0; next }
  /^  token label *:/ { v = $0; sub(/^  token label *: /, "", v); lab = v; next }
  /^  token flags *:/ { pin = index($0, "PIN initialized") > 0; next }
  /^  serial num *:/ { v = $0; sub(/^  serial num *: /, "", v); serial = v; next }
  /^  token state: *uninitialized/ { uninit = 1; next }
  END { flush(); printf "%d %s %d %s\n", n, (out_serial == "" ? "-" : out_serial), out_pin, (free == "" ? "-" : free) }')
count=$1 serial=$2 pin=$3 free=$4
if [ "$count" -eq 0 ]; then
  printf '{"path": "%s", "token": false, "free_slot": "%s"}\n' "$dir" "$free"
  exit 0
fi
if [ "$count" -gt 1 ]; then
  echo "$count tokens in $dir are labelled $label" >&2
  exit 1
fi
# SoftHSM2 names a token's directory by a UUID whose last 16 hex digits are the token's serial number.
tokdir=""
for d in "$dir"/*/; do
  name=$(basename "$d")
  case $(printf '%s' "$name" | tr -d -) in
    *"$serial") tokdir=$name ;;
  esac
done
# "count" of the secret keys labelled like the KEK, then the labels of every secret key as a JSON list.
keys=0 labels='[]'
if [ "$pin" -eq 1 ]; then
  if objects=$(pkcs11-tool --module "$module" --token-label "$label" --login --pin env:KLEIDI_SOFTHSM_PIN \
      --list-objects --type secrkey 2>/dev/null); then
    found=$(printf '%s\n' "$objects" | awk -v want="$key" '
      /^[^ ]/ { secret = ($0 ~ /^Secret Key Object/); next }
      secret && $1 == "label:" {
        v = $0; sub(/^ *label: */, "", v); if (v == want) n++
        gsub(/\\/, "\\\\", v); gsub(/"/, "\\\"", v)
        all = all (all == "" ? "" : ",") "\"" v "\""
      }
      END { print n + 0, "[" all "]" }')
    keys=${found%% *} labels=${found#* }
  else
    keys=-1
  fi
fi
printf '{"path": "%s", "token": true, "serial": "%s", "dir": "%s", "pin_initialized": %s, "key_count": %s, "labels": %s, "free_slot": "%s"}\n' \
  "$dir" "$serial" "$tokdir" "$([ "$pin" -eq 1 ] && echo true || echo false)" "$keys" "$labels" "$free"
