{{- define "stui.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "stui.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "stui.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "stui.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "stui.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stui.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "stui.labels" -}}
{{ include "stui.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "stui.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Environment shared by every container: settings, Redis, metrics dir. */}}
{{- define "stui.env" -}}
- name: PROMETHEUS_MULTIPROC_DIR
  value: /metrics
- name: STUI_REDIS_MODE
  value: {{ .Values.redis.mode | quote }}
- name: STUI_REDIS_WAIT_REPLICAS
  value: {{ .Values.redis.waitReplicas | quote }}
{{- if .Values.redis.sentinel.addresses }}
- name: STUI_REDIS_SENTINELS
  value: {{ join "," .Values.redis.sentinel.addresses | quote }}
- name: STUI_REDIS_MASTER_NAME
  value: {{ .Values.redis.sentinel.masterName | quote }}
{{- end }}
{{- if .Values.redis.password.existingSecret }}
- name: STUI_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.password.existingSecret }}
      key: {{ .Values.redis.password.key }}
{{- end }}
{{- end -}}

{{- define "stui.curveSecretName" -}}
{{- if .Values.curve.existingSecret -}}
{{ .Values.curve.existingSecret }}
{{- else -}}
{{ include "stui.fullname" . }}-curve
{{- end -}}
{{- end -}}

{{- define "stui.backupKeySecretName" -}}
{{- if .Values.backups.existingKeySecret -}}
{{ .Values.backups.existingKeySecret }}
{{- else -}}
{{ include "stui.fullname" . }}-backup-key
{{- end -}}
{{- end -}}

{{/* The HTTP sidecar: health and metrics of every process in the pod. */}}
{{- define "stui.httpContainer" -}}
- name: http
  image: {{ include "stui.image" .root }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  args: ["http", "--bind", "0.0.0.0:{{ .root.Values.http.port }}", "--workers", "{{ .root.Values.http.workers }}"]
  envFrom:
    - configMapRef:
        name: {{ include "stui.fullname" .root }}
  env:
    {{- include "stui.env" .root | nindent 4 }}
    {{- if not .withFront }}
    # No front worker in this pod: /readyz checks Redis only.
    - name: STUI_HEARTBEAT_MAX_AGE
      value: "0"
    {{- end }}
  ports:
    - name: http-metrics
      containerPort: {{ .root.Values.http.port }}
      protocol: TCP
  # The HTTP server answers within a second even with slow clients about; a
  # probe still allows 3 s, and only 3 failures in a row count: one slow
  # answer neither restarts the pod nor takes it out of the Service.
  livenessProbe:
    httpGet:
      path: /healthz
      port: http-metrics
    periodSeconds: 10
    timeoutSeconds: 3
    failureThreshold: 3
  readinessProbe:
    httpGet:
      path: /readyz
      port: http-metrics
    periodSeconds: 5
    timeoutSeconds: 3
    failureThreshold: 3
  resources:
    {{- toYaml .root.Values.http.resources | nindent 4 }}
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: metrics
      mountPath: /metrics
    - name: tmp
      mountPath: /tmp
{{- end -}}

{{- define "stui.topologySpread" -}}
topologySpreadConstraints:
  - maxSkew: {{ .root.Values.topologySpread.maxSkew }}
    topologyKey: {{ .root.Values.topologySpread.topologyKey }}
    whenUnsatisfiable: {{ .root.Values.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "stui.selectorLabels" .root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
  - maxSkew: {{ .root.Values.topologySpread.maxSkew }}
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "stui.selectorLabels" .root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
{{- end -}}
