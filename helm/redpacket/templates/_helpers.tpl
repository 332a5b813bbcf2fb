{{/*
Chart name, at most 63 characters.
*/}}
{{- define "redpacket.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the chart name.
Kept to 40 characters so that "<fullname>-mysql-<ordinal>" and the StatefulSet's
controller-revision-hash label stay within Kubernetes' 63-character limits.
*/}}
{{- define "redpacket.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "redpacket.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels (https://helm.sh/docs/chart_best_practices/labels/).
*/}}
{{- define "redpacket.labels" -}}
helm.sh/chart: {{ include "redpacket.chart" . }}
{{ include "redpacket.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: redpacket
{{- end }}

{{/*
Selector labels: stable for the life of a release, so never the version.
*/}}
{{- define "redpacket.selectorLabels" -}}
app.kubernetes.io/name: {{ include "redpacket.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels and selector labels of one component. Call with (dict "root" $ "component" "node").
*/}}
{{- define "redpacket.componentLabels" -}}
{{ include "redpacket.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Pod labels of a store (Redis, MySQL): no chart or app version, so a release that changes
only the redpacket image or the chart never rolls the stores (issue 20). Call like
componentLabels.
*/}}
{{- define "redpacket.storePodLabels" -}}
{{ include "redpacket.componentSelectorLabels" . }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: redpacket
{{- end }}

{{- define "redpacket.componentSelectorLabels" -}}
{{ include "redpacket.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Names of the components' workloads and Services.
*/}}
{{- define "redpacket.gatewayName" -}}{{ include "redpacket.fullname" . }}-gateway{{- end }}
{{- define "redpacket.nodeName" -}}{{ include "redpacket.fullname" . }}-node{{- end }}
{{- define "redpacket.redisName" -}}{{ include "redpacket.fullname" . }}-redis{{- end }}
{{- define "redpacket.mysqlName" -}}{{ include "redpacket.fullname" . }}-mysql{{- end }}
{{- define "redpacket.ringName" -}}{{ include "redpacket.fullname" . }}-ring{{- end }}

{{/*
Secret holding jwt-secret, node-secret, the store passwords and external store URLs.
*/}}
{{- define "redpacket.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "redpacket.fullname" .) }}
{{- end }}

{{/*
ServiceAccount of the gateway and node pods.
*/}}
{{- define "redpacket.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "redpacket.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
ServiceAccount of rebalance Jobs.
*/}}
{{- define "redpacket.rebalanceServiceAccountName" -}}
{{- if .Values.rebalance.serviceAccount.create }}
{{- default (printf "%s-rebalance" (include "redpacket.fullname" .)) .Values.rebalance.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.rebalance.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The redpacket image.
*/}}
{{- define "redpacket.image" -}}
{{- include "redpacket.imageRef" (dict "repository" .Values.image.repository "tag" (.Values.image.tag | default .Chart.AppVersion) "digest" .Values.image.digest) }}
{{- end }}

{{/*
repository:tag, pinned with @digest when a digest is given (a tag can be moved; a digest
cannot). Call with (dict "repository" .. "tag" .. "digest" ..).
*/}}
{{- define "redpacket.imageRef" -}}
{{- printf "%s:%s" .repository .tag }}{{ with .digest }}@{{ . }}{{ end }}
{{- end }}

{{/*
Name of the Secret key holding store <kind> ("redis" or "mysql") URL of shard <i>.
*/}}
{{- define "redpacket.storeUrlKey" -}}
{{- printf "%s-url-%d" .kind (int .index) }}
{{- end }}

{{/*
Address of node <i> in the ring: its stable DNS name behind the headless Service.
*/}}
{{- define "redpacket.nodeUrl" -}}
{{- $node := include "redpacket.nodeName" .root -}}
{{- printf "http://%s-%d.%s.%s.svc.%s:%d" $node (int .index) $node .root.Release.Namespace .root.Values.clusterDomain (int .root.Values.node.port) }}
{{- end }}

{{/*
Ring document of `shards` shards (sharding/ring.py, RingDoc), as JSON.
*/}}
{{- define "redpacket.ringJson" -}}
{{- $nodes := list }}
{{- range $i := until (int .Values.shards) }}
{{- $nodes = append $nodes (dict "name" (printf "shard-%d" $i) "url" (include "redpacket.nodeUrl" (dict "root" $ "index" $i)) "weight" (int $.Values.ring.weight)) }}
{{- end }}
{{- dict "version" 1 "nodes" $nodes | toPrettyJson }}
{{- end }}

{{/*
Replicas of a shard StatefulSet: `shards`, but never fewer than are running (scaling shards
down without `redpacket rebalance remove` would lose the packets they hold).
Call with (dict "root" $ "name" <statefulset name>).
*/}}
{{- define "redpacket.shardReplicas" -}}
{{- $want := int .root.Values.shards }}
{{- $live := lookup "apps/v1" "StatefulSet" .root.Release.Namespace .name }}
{{- if and $live $live.spec }}
{{- $running := int ($live.spec.replicas | default 0) }}
{{- if lt $want $running }}
{{- fail (printf "shards=%d but StatefulSet %s runs %d replicas: remove shards with `redpacket rebalance remove` first (it scales the StatefulSets and rewrites the ring), or set shards=%d" $want .name $running $running) }}
{{- end }}
{{- end }}
{{- $want }}
{{- end }}

{{/*
Annotations of a pod template: checksum of the values that make the chart's own Secret (rolls
the pods when one changes; generated values are kept, so they never change it), Prometheus scrape annotations, then the user's. Renders the whole `annotations:`
key, or nothing. Call with (dict "root" $ "port" <metrics port or 0> "extra" <dict>).
*/}}
{{- define "redpacket.podAnnotations" -}}
{{- $root := .root }}
{{- $out := dict }}
{{- if not $root.Values.secrets.existingSecret }}
{{- $_ := set $out "checksum/secret" (list $root.Values.secrets $root.Values.externalStores | toJson | sha256sum) }}
{{- end }}
{{- if and .port $root.Values.metrics.podAnnotations }}
{{- $_ := set $out "prometheus.io/scrape" "true" }}
{{- $_ := set $out "prometheus.io/port" (toString .port) }}
{{- $_ := set $out "prometheus.io/path" "/metrics" }}
{{- end }}
{{- $out = merge (deepCopy (.extra | default dict)) $out }}
{{- if $out -}}
annotations:
  {{- toYaml $out | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Bytes of a Kubernetes memory quantity ("1Gi", "512Mi", "2G", "1073741824").
*/}}
{{- define "redpacket.memoryBytes" -}}
{{- $q := toString . }}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 }}
{{- $bytes := 0 }}
{{- $found := false }}
{{- range $suffix := list "Ki" "Mi" "Gi" "Ti" "k" "K" "M" "G" "T" }}
{{- if and (not $found) (hasSuffix $suffix $q) }}
{{- $bytes = mulf (float64 (trimSuffix $suffix $q)) (get $units $suffix) | int64 }}
{{- $found = true }}
{{- end }}
{{- end }}
{{- if not $found }}{{ $bytes = float64 $q | int64 }}{{ end }}
{{- $bytes }}
{{- end }}

{{/*
Redis maxmemory in bytes: redis.maxmemory when set, else redis.maxmemoryPercent of the
container's memory limit. Redis's own overhead (the AOF rewrite's fork copy-on-write, client
buffers, fragmentation) lives in the rest, so a full Redis refuses writes (noeviction)
instead of being OOM-killed and replaying its AOF for minutes.
*/}}
{{- define "redpacket.redisMaxmemory" -}}
{{- if .Values.redis.maxmemory }}
{{- .Values.redis.maxmemory }}
{{- else }}
{{- $limit := include "redpacket.memoryBytes" .Values.redis.resources.limits.memory | int64 }}
{{- if le $limit 0 }}
{{- fail (printf "redis.resources.limits.memory %v: not a memory quantity the chart can read; set redis.maxmemory" .Values.redis.resources.limits.memory) }}
{{- end }}
{{- div (mul $limit (int .Values.redis.maxmemoryPercent)) 100 }}
{{- end }}
{{- end }}

{{/*
Name of the chart's Retain StorageClass when storageClass.create, else empty (the cluster's
default class).
*/}}
{{- define "redpacket.storageClassName" -}}
{{- if .Values.storageClass.create }}
{{- .Values.storageClass.name | default (printf "%s-%s-retain" .Release.Namespace (include "redpacket.fullname" .)) }}
{{- end }}
{{- end }}

{{/*
Shell command of the Redis probes: PONG from the local server; the password (when auth is on)
read from the mounted Secret file into redis-cli's REDISCLI_AUTH, never argv.
*/}}
{{- define "redpacket.redisPing" -}}
{{- if .Values.redis.auth.enabled -}}
REDISCLI_AUTH="$(cat /etc/redpacket/secrets/redis-password)" redis-cli -h 127.0.0.1 -p {{ .Values.redis.port }} ping | grep -q PONG
{{- else -}}
redis-cli -h 127.0.0.1 -p {{ .Values.redis.port }} ping | grep -q PONG
{{- end }}
{{- end }}

{{/*
Topology spread of a component's pods (the whole `topologySpreadConstraints:` key): the
user's constraints when given (the label selector filled in), else the chart's: at most one
pod more on any host than on another (hard, tainted hosts left out of the count), and the
same across zones where nodes carry topology.kubernetes.io/zone (soft: a cluster without
zones is not blocked). Call with (dict "root" $ "component" <name> "given" <list>).
*/}}
{{- define "redpacket.topologySpread" -}}
{{- $selector := dict "matchLabels" (include "redpacket.componentSelectorLabels" . | fromYaml) }}
{{- $spread := .root.Values.topologySpread }}
{{- $constraints := .given }}
{{- if and (not $constraints) $spread.enabled }}
{{- $constraints = list
    (dict "maxSkew" 1 "topologyKey" "kubernetes.io/hostname" "whenUnsatisfiable" $spread.hostWhenUnsatisfiable "nodeTaintsPolicy" "Honor")
    (dict "maxSkew" 1 "topologyKey" "topology.kubernetes.io/zone" "whenUnsatisfiable" $spread.zoneWhenUnsatisfiable) }}
{{- end }}
{{- if $constraints }}
topologySpreadConstraints:
{{- range $constraints }}
  - {{- toYaml (merge (deepCopy .) (dict "labelSelector" $selector)) | nindent 4 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
NetworkPolicy ingress rule of a pod's metrics port (named "metrics"): from
networkPolicy.metricsIngressFrom, or any pod when that is empty.
*/}}
{{- define "redpacket.metricsIngress" -}}
- ports:
    - port: metrics
      protocol: TCP
  {{- with .Values.networkPolicy.metricsIngressFrom }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
Annotations of a store's pod template (the whole `annotations:` key, or nothing): the
checksum of its own password when given in values, and scrape annotations for its
exporter when one runs. Call with (dict "root" $ "store" "redis" "checksum" <bool>
"secret" <value>).
*/}}
{{- define "redpacket.storeAnnotations" -}}
{{- $out := dict }}
{{- if .checksum }}
{{- $_ := set $out (printf "checksum/%s-password" .store) (.secret | sha256sum) }}
{{- end }}
{{- $exporter := index .root.Values.metrics.exporters .store }}
{{- if and $exporter.enabled .root.Values.metrics.podAnnotations }}
{{- $_ := set $out "prometheus.io/scrape" "true" }}
{{- $_ := set $out "prometheus.io/port" (toString $exporter.port) }}
{{- $_ := set $out "prometheus.io/path" "/metrics" }}
{{- end }}
{{- if $out -}}
annotations:
  {{- toYaml $out | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Command of a node pod's container (the whole `command:`/`args:` keys): argv itself with the
in-chart stores; with external ones, a shell that first exports this shard's store URLs from
the mounted Secret files (redis-url-<i> / mysql-url-<i>), then execs argv. Shared by the node
and its migrate init container, so both reach the same database. Call with (dict "root" $
"external" <bool> "redis" <export the Redis URL too> "argv" <list>).
*/}}
{{- define "redpacket.nodeCommand" -}}
{{- $v := .root.Values }}
{{- if .external -}}
# External stores: shard i's URLs are the Secret keys redis-url-<i> / mysql-url-<i>,
# mounted as files; pick this pod's, then run.
command: ["/bin/sh", "-c"]
args:
  - |
    set -eu
    ordinal="${REDPACKET_ORDINAL:-${HOSTNAME##*-}}"
    {{- if and .redis (not $v.redis.enabled) }}
    REDPACKET_REDIS_URL="$(cat "/etc/redpacket/stores/redis-url-${ordinal}")"
    export REDPACKET_REDIS_URL
    {{- end }}
    {{- if not $v.mysql.enabled }}
    REDPACKET_MYSQL_URL="$(cat "/etc/redpacket/stores/mysql-url-${ordinal}")"
    export REDPACKET_MYSQL_URL
    {{- end }}
    exec {{ join " " .argv }}
{{- else -}}
command: {{ toJson .argv }}
{{- end }}
{{- end }}

{{/*
MySQL env entries of a node pod's containers with the in-chart MySQL (nothing with an
external one: its URL comes from the store files, redpacket.nodeCommand). The password comes
from the mounted Secret file, never from the URL in the environment.
*/}}
{{- define "redpacket.nodeMysqlEnv" -}}
{{- if .Values.mysql.enabled }}
{{- $mysql := include "redpacket.mysqlName" . -}}
- name: REDPACKET_MYSQL_PASSWORD_FILE
  value: /etc/redpacket/secrets/mysql-password
- name: REDPACKET_MYSQL_URL
  value: "mysql://{{ .Values.mysql.user }}@{{ $mysql }}-{ordinal}.{{ $mysql }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:{{ .Values.mysql.port }}/{{ .Values.mysql.database }}"
{{- end }}
{{- end }}
