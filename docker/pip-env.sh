# Sourced by the Dockerfile's pip steps: build arguments named like pip's own variables (PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS) configure pip directly; an empty one is unset, not passed as "".
for _var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS; do
    eval "_val=\${$_var:-}"
    if [ -n "$_val" ]; then export "$_var"; else unset "$_var"; fi
done
unset _var _val
