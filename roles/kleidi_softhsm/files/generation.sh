# Makes every SoftHSM2 process that has the token open on this node (a running plugin) see the objects of a store
# copy that was just put under it. SoftHSM2 lists a token's directory again only when the token's `generation` file,
# an 8-byte big-endian counter it raises for every object it creates, differs from the value it read last: a copy
# that brings the source's counter could bring the very value a process read halfway through the copy, before the
# new key's file was there, and that process would never look again. So the copy leaves `generation` out, and this
# writes max(this node's counter, the source's) + 1 after every object file is in place: a value this node's file
# never held, which every process notices at its next look.
# Arguments: the token's generation file (host path), the source's counter. Writes that file only.
set -eu
file=$1 source=$2
own=$(od -An -tu8 --endian=big "$file" 2>/dev/null | tr -d ' \n' || true)
own=${own:-0}
next=$(( (own > source ? own : source) + 1 ))
bytes="" shift=56
while [ "$shift" -ge 0 ]; do
  bytes="$bytes$(printf '\\%03o' $(( (next >> shift) & 255 )))"
  shift=$((shift - 8))
done
printf "$bytes" > "$file.kleidi-new"
mv -f "$file.kleidi-new" "$file"
echo "$next"
