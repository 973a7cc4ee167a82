package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/labels"

	"sigs.k8s.io/custom-metrics-apiserver/pkg/provider"
)

const readmeRule = `externalRules:
  - seriesQuery: 'runnable_k8s_scaling_demand{namespace!="",service!=""}'
    resources: {overrides: {namespace: {resource: namespace}}}
    name: {as: runnable_k8s_scaling_demand}
    metricsQuery: 'max(<<.Series>>{<<.LabelMatchers>>})'
`

func writeRules(t *testing.T, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "rules.yaml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestMatchersFollowPrometheusAdapter(t *testing.T) {
	selector, err := labels.Parse(`service=broker,job!=x,env in (a.b,c),tier notin (d),present,!absent`)
	if err != nil {
		t.Fatal(err)
	}
	got, err := matchers(selector)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{`absent=""`, `env=~"a\\.b|c"`, `job!="x"`, `present=~".+"`, `service="broker"`, `tier!~"d"`}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestRulesOutsideTheSupportedSubsetAreRefused(t *testing.T) {
	for name, text := range map[string]string{
		"matches":  strings.Replace(readmeRule, "{as: runnable_k8s_scaling_demand}", "{matches: '^(.*)$'}", 1),
		"template": strings.Replace(readmeRule, "{overrides: {namespace: {resource: namespace}}}", "{template: '<<.Resource>>'}", 1),
		"pod":      strings.Replace(readmeRule, "resource: namespace", "resource: pod", 1),
		"series":   strings.Replace(readmeRule, "runnable_k8s_scaling_demand{", "{__name__=~'x'", 1),
		"unknown":  readmeRule + "    seriesFilters: []\n",
		"empty":    "externalRules: []\n",
		"template syntax": strings.Replace(readmeRule, "<<.Series>>", "<<.Series", 1),
	} {
		if _, err := loadRules(writeRules(t, text)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// The rule the chart README documents, against a Prometheus that answers like one (and one that does not).
func TestTheReadmeRuleQueriesPrometheus(t *testing.T) {
	var asked []string
	answer := `{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"7.5"]}]}}`
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		asked = append(asked, r.URL.Query().Get("query"))
		_, _ = w.Write([]byte(answer))
	}))
	defer server.Close()
	rules, err := loadRules(writeRules(t, readmeRule))
	if err != nil {
		t.Fatal(err)
	}
	base, _ := url.Parse(server.URL)
	p := &prometheusProvider{base: base, client: server.Client(), rules: map[string]externalRule{rules[0].metric: rules[0]}}
	selector, _ := labels.Parse("service=pool-broker")
	info := provider.ExternalMetricInfo{Metric: "runnable_k8s_scaling_demand"}
	list, err := p.GetExternalMetric(context.Background(), "ns1", selector, info)
	if err != nil {
		t.Fatal(err)
	}
	if want := `max(runnable_k8s_scaling_demand{namespace="ns1",service="pool-broker"})`; asked[0] != want {
		t.Fatalf("asked %q, want %q", asked[0], want)
	}
	if got := list.Items[0].Value.MilliValue(); got != 7500 {
		t.Fatalf("value %d milli, want 7500", got)
	}
	for _, bad := range []string{
		`{"status":"error","error":"parse error"}`,
		`{"status":"success","data":{"resultType":"matrix","result":[]}}`,
		`{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"x"]}]}}`,
		`not json`,
		`{"status":"success","data":{"resultType":"vector","result":[]}}`,
	} {
		answer = bad
		if _, err := p.GetExternalMetric(context.Background(), "ns1", selector, info); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
	if _, err := p.GetExternalMetric(context.Background(), "ns1", selector, provider.ExternalMetricInfo{Metric: "other"}); err == nil {
		t.Error("served a metric no rule names")
	}
}
