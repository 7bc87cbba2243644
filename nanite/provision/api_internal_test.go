package provision

import (
	"encoding/json"
	"slices"
	"testing"
)

func TestTagList(t *testing.T) {
	for in, want := range map[string][]string{
		`{"tags":["nanite","x"]}`: {"nanite", "x"},
		`{"tags":"nanite, x"}`:    {"nanite", "x"},
		`{"tags":""}`:             nil,
		`{}`:                      nil,
	} {
		var v vhostInfo
		if err := json.Unmarshal([]byte(in), &v); err != nil || !slices.Equal(v.Tags, want) {
			t.Errorf("%s: %v %v", in, v.Tags, err)
		}
	}
}
