#!/bin/sh
# The DaemonSet's optional init container (values: softhsm.initToken). Creates the SoftHSM2 token and its AES-256
# KEK (private, sensitive, never extractable) when the token directory is empty, and never touches a directory
# that holds anything: an existing token is the only copy of its KEK.
# Inputs: SOFTHSM2_CONF and the KLEIDI_* variables the DaemonSet sets from the values.
set -eu

dir=$KLEIDI_TOKEN_DIR
if [ -n "$(ls -A "$dir")" ]; then
  echo "kleidi: $dir already holds a token store; leaving it as it is"
  exit 0
fi
if [ ! -w "$dir" ]; then
  echo "kleidi: $dir is not writable by uid $(id -u); create it on the node owned by the plugin's user, mode 0700" >&2
  exit 1
fi
for file in "$KLEIDI_PIN_FILE" "$KLEIDI_SO_PIN_FILE"; do
  if [ ! -s "$file" ]; then
    echo "kleidi: cannot read $file (a PIN file, on the node under the credentials directory)" >&2
    exit 1
  fi
done

# The PINs reach pkcs11-tool through its environment (env:NAME), never through any process's arguments.
KLEIDI_PIN=$(cat "$KLEIDI_PIN_FILE")
KLEIDI_SO_PIN=$(cat "$KLEIDI_SO_PIN_FILE")
export KLEIDI_PIN KLEIDI_SO_PIN

tool() {
  pkcs11-tool --module "$KLEIDI_PKCS11_MODULE" "$@" >/dev/null
}
tool --slot-index 0 --init-token --label "$KLEIDI_TOKEN_LABEL" --so-pin env:KLEIDI_SO_PIN
tool --token-label "$KLEIDI_TOKEN_LABEL" --login --login-type so --so-pin env:KLEIDI_SO_PIN --init-pin \
  --new-pin env:KLEIDI_PIN
tool --token-label "$KLEIDI_TOKEN_LABEL" --login --pin env:KLEIDI_PIN --keygen --key-type AES:32 \
  --label "$KLEIDI_KEY_LABEL" --id 01 --private --sensitive
echo "kleidi: created token $KLEIDI_TOKEN_LABEL with KEK $KLEIDI_KEY_LABEL in $dir"
